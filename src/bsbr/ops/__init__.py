"""Pure tensor functions: the reference, parallel and recurrent forms of each mechanism."""
