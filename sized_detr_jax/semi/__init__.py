"""Semi-DETR pieces (design.md section 9): pseudo-labels from the EMA teacher
(pseudo_labels.py), cost-based pseudo-label mining with a 1-D GMM (gmm.py), the cross-view
consistency loss and its RoIAlign projector (consistency.py)."""
