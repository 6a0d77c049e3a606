"""Plain nn.Modules of ZIM and the label converter; no Lightning, no file formats."""
