"""Python components of the LSMS referring lesion segmentation bundle.

Network, transforms, losses, metrics, data tools, clinical input and output.
"""
