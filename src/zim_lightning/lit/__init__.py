"""LightningModules and the Lightning CLI; they receive built networks and know no file formats."""
