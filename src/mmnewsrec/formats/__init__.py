"""The ground floor's artifact formats: what every stage reads. Imports no model code.

`store` (prepare), `vectors` (encode) and `runs` (train) each describe one folder on disk.
"""
