"""Triton Python-backend model (copied into the serving repository as ``<model>/1/model.py``).

It runs inside tritonserver's stub process: it puts the serving interpreter's sys.path in place (the package's own
folder first), imports `turbo_export.serve.handlers` (numpy and onnxruntime only: importing turbo_export imports no
torch), and answers each
request of a dynamic batch on its own: outputs, or an error for that request only (INVALID_ARG, HTTP 400, for
bad contents; INTERNAL, HTTP 500, for a model failure), each as one line.

Numeric tensors cross the stub boundary through DLPack: the stub of tritonserver 2.51 is built against numpy 1's
C ABI, and `pb_utils.Tensor(name, ndarray)` gets the item size wrong under numpy 2 (HTTP 500 "output tensor shape
does not match size of output"); DLPack carries dtype and shape without that ABI. BYTES tensors have no such
route (under numpy 2 a BYTES input crashes the stub), so serve.py drops BYTES models when numpy >= 2.
"""

import json
import os
import sys

# The serving interpreter's sys.path, first, before the stub imports numpy for triton_python_backend_utils
# (that import follows this module's import, precedes initialize()).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sys_path.json")) as _f:
    for _path in reversed(json.load(_f)):
        if _path not in sys.path:
            sys.path.insert(0, _path)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        spec = json.loads(config["parameters"]["turbo_export"]["string_value"])
        import numpy as np
        import triton_python_backend_utils as pb_utils

        from turbo_export.serve.handlers import ModelError, RequestError, make_handler, one_line

        self.np, self.pb, self.RequestError, self.ModelError, self.one_line = \
            np, pb_utils, RequestError, ModelError, one_line
        spec.setdefault("name", config["name"])  # error messages name the model
        self.numpy2 = int(np.__version__.split(".")[0]) >= 2
        self.inputs = {t["name"]: t["dtype"] for t in spec["inputs"]}
        self.outputs = {t["name"]: t["dtype"] for t in spec["outputs"]}
        self.handler = make_handler(spec)
        print(f"turbo-export: {config['name']} ready ({spec['handler']}, numpy {np.__version__})", file=sys.stderr,
              flush=True)

    def _input(self, request, name):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        if self.inputs[name] == "bytes":
            return tensor.as_numpy()
        return self.np.array(self.np.from_dlpack(tensor), copy=True)

    def _output(self, name, value):
        np = self.np
        if self.outputs[name] == "bytes":
            return self.pb.Tensor(name, np.asarray(value, dtype=np.object_))
        value = np.ascontiguousarray(value, dtype=self.outputs[name])
        if self.numpy2:
            return self.pb.Tensor.from_dlpack(name, value.__dlpack__())
        return self.pb.Tensor(name, value)

    def execute(self, requests):
        """One response per request: outputs, INVALID_ARG (HTTP 400) for a request the handler refused, INTERNAL
        (HTTP 500) for one the model failed on; the handler keeps each request's failure to that request."""
        pb = self.pb
        responses = []
        try:
            feeds = [{n: v for n in self.inputs if (v := self._input(r, n)) is not None} for r in requests]
            results = self.handler.handle(feeds)
        except Exception as exc:  # a bug outside the handler's per-request isolation: one line, full text logged
            import traceback

            traceback.print_exc(file=sys.stderr)
            message = f"internal error: {type(exc).__name__}: {self.one_line(str(exc)) or 'no message'}"
            return [pb.InferenceResponse(error=pb.TritonError(message)) for _ in requests]
        for result in results:
            if isinstance(result, self.RequestError):
                responses.append(pb.InferenceResponse(error=pb.TritonError(self.one_line(str(result)),
                                                                          pb.TritonError.INVALID_ARG)))
            elif isinstance(result, BaseException):
                responses.append(pb.InferenceResponse(error=pb.TritonError(self.one_line(str(result)))))
            else:
                try:
                    responses.append(pb.InferenceResponse([self._output(n, v) for n, v in result.items()]))
                except Exception as exc:
                    message = f"internal error: {type(exc).__name__}: {self.one_line(str(exc)) or 'no message'}"
                    responses.append(pb.InferenceResponse(error=pb.TritonError(message)))
        return responses

    def finalize(self):
        self.handler = None
