from lmcompress.evaluate.classification import classification_metrics, evaluate_classifier
from lmcompress.evaluate.perplexity import perplexity
from lmcompress.evaluate.speed import decode_speed, prefill_speed

__all__ = ["classification_metrics", "decode_speed", "evaluate_classifier", "perplexity", "prefill_speed"]
