"""The admin API: JSON over HTTP on its own listener, served by the control plane."""
