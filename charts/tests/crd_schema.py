"""The CRD's OpenAPI schema as JSON Schema, for the chart's and the docs' tests."""


def openapi_to_jsonschema(schema):
    """The CRD's structural schema as JSON Schema: nullable fields also accept null, and
    unknown fields are refused as the API server prunes (here: refuses) them."""
    if isinstance(schema, dict):
        out = {k: openapi_to_jsonschema(v) for k, v in schema.items()
               if not k.startswith("x-kubernetes")}
        if schema.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
        return out
    if isinstance(schema, list):
        return [openapi_to_jsonschema(v) for v in schema]
    return schema
