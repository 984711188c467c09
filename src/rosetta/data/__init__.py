"""Data: corpus reading, toy task, download, SentencePiece, preparation, batching."""
