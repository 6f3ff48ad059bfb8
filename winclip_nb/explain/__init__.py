"""Explanations of detected anomalies (notebook 05): a rule-based explainer, a LLaVA-OneVision
explainer, and reports (text, JSON, heat map and boxes figures)."""
