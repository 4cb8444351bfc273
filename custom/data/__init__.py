"""Data tools of the LSMS bundle: the embedded synthetic referring dataset, the LiTS / MSD converter, the
referring datalist (loading, validation, one item per expression) and the dataset summary.

The datalist contract is described in :mod:`custom.data.datalist` and in the model card (Data).
"""
