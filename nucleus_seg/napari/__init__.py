"""napari plugin (npe2 manifest ``napari.yaml``): the "Segment nuclei" widget, a reader for label TIFFs,
a Labels writer and the DSB-2018 sample. Top of the package: nothing else in nucleus_seg imports it."""
