"""Prediction: the sliding window and its test-time flips (``sliding_window``), how a member runs
(``predictors``: eager, compiled or graphed on a GPU; ``backends``: PyTorch or OpenVINO on a CPU),
the member checkpoint (``members``), an ensemble folder with its manifest and calibration
(``ensemble``), the ensemble's confidence in its own mask where no truth exists (``quality``), one
scan or a folder segmented (``segment``), and the teacher's pseudo-labels of unlabelled scans
(``pseudo_labels``)."""
