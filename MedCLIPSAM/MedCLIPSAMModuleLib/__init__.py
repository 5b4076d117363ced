"""Qt-free helpers of the MedCLIPSAM Slicer module, one concern per file."""
