from lmcompress.evaluate.classification import classification_metrics, evaluate_classifier
from lmcompress.evaluate.generation import evaluate_generation, rouge
from lmcompress.evaluate.perplexity import perplexity
from lmcompress.evaluate.speed import decode_speed, prefill_speed

__all__ = ["classification_metrics", "decode_speed", "evaluate_classifier", "evaluate_generation", "perplexity",
           "prefill_speed", "rouge"]
