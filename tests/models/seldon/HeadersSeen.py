"""For the header tests: answers its input unchanged and, in meta.tags, `saw`: the JSON of every
HTTP header of the request as the model reads it (Flask under gunicorn, a WSGI server: `x_a` and
`x-a` both arrive as `X-A`), names in lower case. gRPC: no headers seen."""
import json


class HeadersSeen:
    def __init__(self):
        self.seen = {}

    def predict(self, X, features_names=None, meta=None):
        try:
            from flask import request

            self.seen = {k.lower(): v for k, v in request.headers.items()}
        except Exception:  # gRPC: no Flask request
            self.seen = {}
        return X

    def tags(self):
        return {"saw": json.dumps(self.seen, sort_keys=True)}
