"""The backends, one module each (`onnx`, `coreml`, `tensorrt`), found by name through
`edgeport.export.registry` (not this package's namespace: `edgeport.export` is also the SDK
function that `import edgeport` re-exports)."""
