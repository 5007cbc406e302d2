"""The MaskDINO-derived binary region-proposal network (paper §4.1, App. A)."""
