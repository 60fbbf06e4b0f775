"""Run the real upstream 3D-generator samplers on CPU with tiny random-weight models (see README.md)."""
