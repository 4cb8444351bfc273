"""Python components of the LSMS referring lesion segmentation bundle (network, transforms, losses, metrics, data tools)."""
