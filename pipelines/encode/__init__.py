"""DICOM results for the PACS: SEG, TID 1500 SR and an encapsulated PDF report."""
