"""A few-line MLServer model for the tests: every input tensor comes back doubled."""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class Doubler(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = []
        for inp in payload.inputs:
            x = NumpyCodec.decode_input(inp)
            outputs.append(NumpyCodec.encode_output(name=f"{inp.name}_x2", payload=x * 2))
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)
