// scp/scp_write.cc: placeholder until its issue lands.
