"""Models and data the project builds itself, since nothing may be downloaded from a model hub."""
