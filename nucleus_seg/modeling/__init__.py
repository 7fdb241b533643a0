"""What nucleus_seg changes in detectron2's models, per model instance: batched exact inference, precision."""
