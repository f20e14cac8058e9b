"""Network definitions only: the colorizers (MONAI), SYMNet and its diffeomorphic blocks."""
