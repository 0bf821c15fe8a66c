"""Workers and their processors (internal)."""
