"""Loading: DICOM folders and research image files to volumes; sequence roles."""
