"""`mer bench`: mer against its peers (llama.cpp, fio, the memory bus), measured side by side."""
