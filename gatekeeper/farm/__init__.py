"""Many boxes as one farm: what each measured, shared with its peers."""
