"""Pixel clustering (paper Eq. 3-4): k-means centroids on a pixel subset, then nearest-centroid labels."""
