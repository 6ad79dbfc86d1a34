"""Data stages: download (or generate) raw text, clean it into documents."""
