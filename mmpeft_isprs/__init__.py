"""MFNet and the ISPRS remote-sensing pipeline built on mmpeft (never imported by mmpeft)."""
