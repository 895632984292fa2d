"""Synthetic worlds: seeded generators and exact rule judges for CPU-sized studies (DESIGN s3)."""
