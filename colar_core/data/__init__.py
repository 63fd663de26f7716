"""Data layer: records, validation, readers for GSM8k-Aug / JSONL / GSM8K / HF datasets, the
built-in synthetic task, and ``prepare_data`` which writes validated splits plus a manifest."""
from .equations import check_equation, evaluate, parse_number
from .prepare import SPLITS, file_digest, load_split, prepare_data, write_split
from .readers import FORMATS, ReadResult, hf_split_names, read_records, resolve_format, validate_record
from .records import DataError, Record
from .synthetic import builtin_splits, difficulty_spec, generate_problems

__all__ = [
    "Record", "DataError", "check_equation", "evaluate", "parse_number",
    "ReadResult", "read_records", "resolve_format", "validate_record", "hf_split_names", "FORMATS",
    "generate_problems", "builtin_splits", "difficulty_spec",
    "prepare_data", "write_split", "load_split", "file_digest", "SPLITS",
]
