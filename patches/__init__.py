"""Adapters that hook one upstream generator family each."""
