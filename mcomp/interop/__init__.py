"""Interoperability with published weights: the released ModelCompose checkpoints (`mcomp import
modelcompose`) and the public encoder files they use (CLIP, BEATs, LanguageBind video, Point-BERT)."""
