-- First start of the compose PostgreSQL (docker-entrypoint-initdb.d): one database per service,
-- owned by the POSTGRES_USER that the official image creates.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
