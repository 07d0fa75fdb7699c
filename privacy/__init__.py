"""DP-SGD wiring (Opacus), noise calibration and privacy accounting."""
