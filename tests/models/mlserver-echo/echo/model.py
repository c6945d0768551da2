"""An MLServer echo model for the benchmark: inputs come back as outputs."""
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class Echo(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = [ResponseOutput(name=i.name, shape=i.shape, datatype=i.datatype, data=i.data) for i in payload.inputs]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)
