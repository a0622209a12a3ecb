"""sarcnode: a DICOM node that brings sarcoma-MRI AI into the PACS workflow."""

__version__ = "0.1.0"
