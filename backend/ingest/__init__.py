"""Ingest: import of uploads, folders and archives (labeled or not), the crawler, dedupe and the group-aware split."""
