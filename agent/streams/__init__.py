"""Sources of task records and sinks for answers (the IO shell around the agent)."""

from agent.streams.sinks import JsonlSink, RecentIds
from agent.streams.synthetic import SyntheticStream, describe, make_stream
from agent.streams.sources import JsonlFileSource, Record, Source, SpoolDirSource, StdinSource, iter_records

__all__ = ["JsonlSink", "RecentIds", "JsonlFileSource", "Record", "Source", "SpoolDirSource", "StdinSource", "iter_records", "SyntheticStream", "describe", "make_stream"]
