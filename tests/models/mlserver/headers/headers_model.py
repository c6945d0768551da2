"""An MLServer model for the header tests: its inputs come back unchanged, plus a BYTES output
`saw` holding the JSON of the request headers (REST) or metadata (gRPC) it was called with.
It answers `x-model-saw` (the request id it saw) and `model-private` as response headers
(gRPC: metadata)."""
import json

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceRequest, InferenceResponse, Parameters, ResponseOutput


class Headers(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        seen = (payload.parameters.headers if payload.parameters else None) or {}
        seen = {k.lower(): v for k, v in seen.items()}
        outputs = [ResponseOutput(name=i.name, shape=i.shape, datatype=i.datatype, data=i.data) for i in payload.inputs]
        outputs.append(StringCodec.encode_output(name="saw", payload=[json.dumps(seen, sort_keys=True)]))
        answer = {"x-model-saw": seen.get("x-request-id", "none"), "model-private": "not-for-the-record"}
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs, parameters=Parameters(headers=answer))
