"""A few-line Seldon Python-wrapper model for the tests: numbers come back times 10; strData and
jsonData are echoed with a marker so a test can tell the model saw them."""
import numpy as np


class Scaler:
    def predict(self, X, features_names=None, meta=None):
        if isinstance(X, (str, bytes)):
            return f"seen:{X if isinstance(X, str) else X.decode()}"
        if isinstance(X, dict):
            return {"seen": X}
        return np.asarray(X) * 10
