"""Uses of other projects' private APIs, one module per project, each with the version it was checked against."""
