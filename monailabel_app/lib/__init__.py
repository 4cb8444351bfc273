"""Tasks of the MONAI Label app that serves the LSMS referring lesion segmentation bundle."""
