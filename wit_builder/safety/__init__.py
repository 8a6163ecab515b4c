"""Responsible curation: blocklists and opt-out lists (URL, URL prefix, domain; image sha256 and
perceptual hash) and evaluation-set decontamination.

- `lists`: the `{name, kind, path, ...}` config tables, reading list files, the record of lists used;
- `urls`: host/URL normalisation and URL-kind lists matched column-wise (candidates stage);
- `hashes`: sha256/phash entries and the band index over 64-bit hashes;
- `screen`: what the candidates and filter stages apply, with the drop reasons
  `safety:blocklist:<name>`, `safety:optout:<name>`, `safety:eval_duplicate`;
- `evalset`: the cached phash index of the user's evaluation images;
- `python -m wit_builder.safety phash DIR...`: phash list entries for your own images.
"""
