// scp/scp_pixels.cc: placeholder until its issue lands.
