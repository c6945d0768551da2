"""Every node of the graph tests in one Seldon Python-wrapper class; NODE_ROLE says which model
it is (a: times 2, b: times 3). Records carry rows [x, r]: x the value the nodes change, r the
branch the router picks. What the node saw of the request's HTTP headers (REST only) comes back
in meta.tags as <role>_saw_<header>."""
import os

import numpy as np

ROLE = os.environ.get("NODE_ROLE", "x")
FACTOR = {"a": 2.0, "b": 3.0}.get(ROLE, 1.0)
HEADERS = ("Seldon-Puid", "tenant", "traceparent")


class GraphNode:
    def __init__(self):
        self.seen = {}

    def _see(self):
        self.seen = {}
        try:
            from flask import request

            for h in HEADERS:
                v = request.headers.get(h)
                if v is not None:
                    self.seen[f"{ROLE}_saw_{h.lower()}"] = v
        except Exception:  # gRPC: no Flask request
            pass

    def transform_input(self, X, features_names=None, meta=None):
        X = np.asarray(X, dtype=float)
        X[:, 0] += 1
        return X

    def predict(self, X, features_names=None, meta=None):
        self._see()
        X = np.asarray(X, dtype=float)
        X[:, 0] *= FACTOR
        return X

    def route(self, features, feature_names):
        return int(np.asarray(features)[0][1])

    def aggregate(self, features_list, feature_names_list):
        rows = [np.asarray(f, dtype=float) for f in features_list]
        out = rows[0].copy()
        out[:, 0] = sum(r[:, 0] for r in rows)
        return out

    def transform_output(self, X, features_names=None, meta=None):
        X = np.asarray(X, dtype=float)
        X[:, 0] -= 5
        return X

    def tags(self):
        return dict(self.seen)
