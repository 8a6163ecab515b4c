"""Per-sample filters used by the `filter` stage, one small module each.

- basic: image size, aspect ratio, caption length
- language: caption language identification (py3langid, model inside the wheel)
- dedup: exact (sha256) and near (perceptual hash) duplicates, global across a run
- clip_score: image-caption cosine similarity with an open_clip model from a local checkpoint
"""
