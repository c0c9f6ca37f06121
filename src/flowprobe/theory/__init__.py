"""What residual flows can and cannot express: one module per result of Kong & Chaudhuri (2020)."""
