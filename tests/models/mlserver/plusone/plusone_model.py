"""A few-line MLServer transformer for the graph tests: every input tensor comes back plus one
(as `<name>_plus1`). It answers the `tenant` header it saw as `x-plusone-tenant`."""
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, Parameters


class PlusOne(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = []
        for inp in payload.inputs:
            x = NumpyCodec.decode_input(inp)
            outputs.append(NumpyCodec.encode_output(name=f"{inp.name}_plus1", payload=x + 1))
        seen = (payload.parameters.headers if payload.parameters else None) or {}
        tenant = seen.get("tenant")
        params = Parameters(headers={"x-plusone-tenant": tenant}) if tenant else None
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs, parameters=params)
